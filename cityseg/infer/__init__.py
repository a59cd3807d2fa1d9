"""A trained model on frames, files and splits. One question per module:

- predictor.py: the one inference path (uint8 frames -> logits -> labels, scores) that
  validation, evaluate, calibrate, predict, serving and the exported graph share
- loading.py: a trained model, from a run (its local checkpoint or its artifact copy) or a file
- evaluation.py: its scores on a split, the calibrated threshold, an evaluation's MLflow run
- files.py: `predict` on image files and folders (masks, overlays, probabilities), its progress
- video.py: `predict` on video files, frame by frame (the only PyAV import)
- submission.py: files for the Cityscapes benchmark server (`predict --format cityscapes`)
"""
