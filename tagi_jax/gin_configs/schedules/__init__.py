"""gin files: schedules/ (a package so that gin can include them as tagi_jax/gin_configs/schedules/<name>.gin)."""
