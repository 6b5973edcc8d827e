// OHIF's configuration in the ct-zeroshot pipeline: one data source, Orthanc's DICOMweb plugin behind the
// same origin (nginx.conf proxies /dicom-web/), so the browser's basic credentials reach it unchanged.
try {
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); // no onboarding tour over the image
} catch (e) {}
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  customizationService: {
    // ct-zeroshot's SR has one TID 1501 group per finding; most are qualitative (present or absent, a
    // certainty) and carry no image coordinates. OHIF 3.13 reads the first coordinate of every group it
    // places on a series, and a group it cannot place is tried again on every other series of the study
    // (the SEG's included); both fail on a group without coordinates and stop the viewer. Such a group is
    // taken as placed (nowhere) and handed on with an empty coordinate, which OHIF skips.
    onBeforeSRAddMeasurement: {
      $set: ({ measurement }) => {
        if (measurement.coords && measurement.coords.length) {
          return measurement;
        }
        measurement.loaded = true;
        return { ...measurement, coords: [{}] };
      },
    },
  },
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (ct-zeroshot pipeline)',
        name: 'orthanc',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
