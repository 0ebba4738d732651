"""`msgctl` (`main`) and its verbs: admin commands over the control socket (`admin`), the
gateway tools (`gateway`), and the demo set-up `make run` uses (`demo`)."""
