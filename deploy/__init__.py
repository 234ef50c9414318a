"""Deployment: export (torch -> ONNX + sidecar) and the torch-free runtime, audit and calibration."""
