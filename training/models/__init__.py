"""Dual-encoder models: 3D image towers (MONAI ResNets), text towers (Hugging Face), the joint space."""
