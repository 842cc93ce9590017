"""`sstoken validate`: artifact folders checked against their schemas, manifests and the alignment contract."""
