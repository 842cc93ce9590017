"""The one stage output, files and manifests, schemas, errors, the config base, the Ray session, fingerprints, checkpoints, the model zoo."""
