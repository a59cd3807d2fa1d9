"""Benchmarks (`make bench`, `python -m cityseg.bench [--json]`): is cityseg fast, and why?

One run, on the same frames, model, batch and machine:
- end to end: cityseg's real trainer and data path (decode cache, augmentations in workers,
  metrics, MLflow logging), as configured and with trainer.compile, against a plain PyTorch
  loop written the way the original script trained (PIL decode and PIL transforms in
  __getitem__, fp32, NCHW, a .item() every step), alternated, with the median and spread of
  each and their ratio;
- the bare training step (random tensors, bf16 + channels_last; eager and compiled) the
  trainer should approach, timed in every repeat beside the end-to-end runs;
- model FLOPs per image (torch's flop counter), the device's measured matmul peak in the same
  precision, and the model FLOP utilisation (MFU) of the bare step and of the end-to-end run;
- the data path's ceiling: images/s the DataLoader alone delivers, and which one bounds training;
- end to end with the augmentations batched on the training device (data.augment_on: device);
- inference at full resolution (1024x2048, batch 1): whole, slide and slide + flip on torch
  eager, torch.compile and ONNX Runtime, predict end to end against the bare forward pass and
  what bounds it (decode, model, write), and the host each figure comes from.
Then the older tables: training step by precision and layout, and decoding vs the cache.

One question per module: baseline.py (what is measured), steps.py (the bare step, FLOPs,
the matmul peak), data.py (the data path alone), training.py (end to end, side by side),
inference.py (inference speed), host.py (the CPU, its cores and matrix instructions),
report.py (tables), __main__.py (the command line).

Figures, not asserts. Everything it needs is generated (synthetic 2048x1024 streets under
runs/bench/); --cityscapes ROOT uses real frames.
"""
