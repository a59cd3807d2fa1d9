"""The model where cityseg is not. One question per module:

- export.py: the model as one graph, uint8 photos in and masks out (ONNX, torch.export .pt2),
  built from the Predictor's own steps
- onnx_engine.py: `predict --engine onnxruntime`, the exported graph in place of the Predictor
- pyfunc.py: the MLflow pyfunc model and how it is logged; the one module outside tracking/
  that imports mlflow (MLflow runs this file as the model's code)
"""
