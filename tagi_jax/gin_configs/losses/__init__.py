"""gin files: losses/ (a package so that gin can include them as tagi_jax/gin_configs/losses/<name>.gin)."""
