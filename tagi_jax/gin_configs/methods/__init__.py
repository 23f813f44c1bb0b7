"""gin files: methods/ (a package so that gin can include them as tagi_jax/gin_configs/methods/<name>.gin)."""
