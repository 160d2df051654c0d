-- Run once by the postgres image on an empty volume: the catalog database exists (POSTGRES_DB);
-- MLflow and Prefect each get their own, owned by the same role.
CREATE DATABASE mlflow OWNER featureatlas;
CREATE DATABASE prefect OWNER featureatlas;
