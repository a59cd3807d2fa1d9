"""Engine: one run from config to closed MLflow run (build, recorder, runner, trainer), the
one inference path (predictor, inference), checkpoints, resuming, and the world of processes."""
