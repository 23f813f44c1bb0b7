"""gin files: mesh/ (a package so that gin can include them as tagi_jax/gin_configs/mesh/<name>.gin)."""
