"""``polyrpc bench``: the same echo workloads over every usable transport and reference rows."""
