"""Typed contracts of featureatlas: the pipeline spec, method configs, artifact references, settings and the
catalog tables. No torch and no Prefect here."""
