"""gin files: models/ (a package so that gin can include them as tagi_jax/gin_configs/models/<name>.gin)."""
