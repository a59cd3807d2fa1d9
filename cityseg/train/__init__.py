"""One `cityseg run`, top to bottom. One question per module; a newcomer reads runner.py first:

- runner.py: the path of one run: world, resume point, build, record, fit (`run`)
- build.py: config -> the parts a run trains with (data, loaders, model, predictor, loss, optimizer)
- resume.py: which checkpoint does a run continue from, and may it?
- recorder.py: every side effect of a run (its MLflow run, epoch records, checkpoints, its end);
  a NullRecorder on ranks > 0
- trainer.py: the loop, from batch to checkpoint, on one process or many
- state.py: the loop's state (TrainState), packed into checkpoints with the RNG states
- health.py: is training healthy? (the epoch's device tally, TrainingDiverged)
- display.py: what a person sees (a Rich progress bar and an epoch table, plain text off a TTY)
- provenance.py: the run's provenance tags (code, packages, host, device, precision)
"""
