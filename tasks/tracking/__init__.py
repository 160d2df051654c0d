"""MLflow tracking, the SQL catalog, artifact identity and the run-or-reuse logic every stage shares."""
