"""Operating msgd: the admin control socket (`control`), Prometheus metrics and the health
probe (`metrics`), sd_notify and the watchdog protocol (`systemd`)."""
