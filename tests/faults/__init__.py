"""The fault suite: each fault a user or an adversary met, rerun with real processes, and what
it leaves behind checked in the MLflow run (its status, and one value per epoch)."""
