"""Tissue labels of the phantoms and their attenuation in Hounsfield units."""

from __future__ import annotations

from enum import IntEnum


class T(IntEnum):
    """Tissue labels."""

    AIR = 0
    SUBQ_FAT = 1
    MUSCLE = 2
    VISC_FAT = 3
    LIVER = 4
    GALLBLADDER = 5
    SPLEEN = 6
    PANCREAS = 7
    ADRENAL = 8
    CORTEX = 9
    MEDULLA = 10
    SINUS_FAT = 11
    URINE = 12
    BOWEL_WALL = 13
    BOWEL_AIR = 14
    BOWEL_FLUID = 15
    STOOL = 16
    AORTA = 17
    IVC = 18
    PORTAL = 19
    CORTICAL_BONE = 20
    TRABECULAR_BONE = 21
    DISC = 22
    LUNG = 23
    MYOCARDIUM = 24
    BLOOD = 25
    BLADDER = 26
    PROSTATE = 27
    UTERUS = 28
    NODE = 29
    FLUID = 30
    CYST = 31
    CALCIUM = 32
    STONE = 33
    METAL = 34
    THROMBUS = 35
    METASTASIS = 36
    EDEMA_WALL = 37
    STRANDING = 38
    FREE_AIR = 39
    ATELECTASIS = 40
    SUBQ_EDEMA = 41
    BILE = 42
    HYPODENSITY = 43
    SCLEROSIS = 44
    CSF = 45
    TABLE = 46


# Mean HU of each tissue in a portal-venous phase CT (before per-patient modulation).
HU = {
    T.AIR: -1000,
    T.SUBQ_FAT: -105,
    T.MUSCLE: 52,
    T.VISC_FAT: -95,
    T.LIVER: 108,
    T.GALLBLADDER: 8,
    T.SPLEEN: 118,
    T.PANCREAS: 95,
    T.ADRENAL: 60,
    T.CORTEX: 175,
    T.MEDULLA: 130,
    T.SINUS_FAT: -70,
    T.URINE: 6,
    T.BOWEL_WALL: 85,
    T.BOWEL_AIR: -960,
    T.BOWEL_FLUID: 18,
    T.STOOL: -180,
    T.AORTA: 190,
    T.IVC: 140,
    T.PORTAL: 175,
    T.CORTICAL_BONE: 900,
    T.TRABECULAR_BONE: 230,
    T.DISC: 85,
    T.LUNG: -860,
    T.MYOCARDIUM: 95,
    T.BLOOD: 185,
    T.BLADDER: 8,
    T.PROSTATE: 48,
    T.UTERUS: 95,
    T.NODE: 52,
    T.FLUID: 12,
    T.CYST: 4,
    T.CALCIUM: 750,
    T.STONE: 520,
    T.METAL: 2800,
    T.THROMBUS: 45,
    T.METASTASIS: 42,
    T.EDEMA_WALL: 18,
    T.STRANDING: -35,
    T.FREE_AIR: -990,
    T.ATELECTASIS: 58,
    T.SUBQ_EDEMA: -20,
    T.BILE: 10,
    T.HYPODENSITY: 22,
    T.SCLEROSIS: 480,
    T.CSF: 12,
    T.TABLE: 160,
}
CONTRAST_ENHANCED = {
    T.LIVER,
    T.SPLEEN,
    T.PANCREAS,
    T.CORTEX,
    T.MEDULLA,
    T.AORTA,
    T.IVC,
    T.PORTAL,
    T.MYOCARDIUM,
    T.BLOOD,
    T.BOWEL_WALL,
    T.UTERUS,
    T.ATELECTASIS,
}
FAT = (T.VISC_FAT,)
SOFT_SPACE = (T.VISC_FAT, T.FLUID, T.STRANDING)
