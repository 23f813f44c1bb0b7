"""gin files: runs/ (a package so that gin can include them as tagi_jax/gin_configs/runs/<name>.gin)."""
