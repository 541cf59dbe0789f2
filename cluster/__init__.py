"""The team's services: a PostgreSQL-backed MLflow tracking server and a Ray cluster, started by make targets."""
