"""TLS for both sides: contexts and post-handshake checks (`contexts`), the key-exchange
groups (`groups`), and the development PKI tooling behind `certs/make-dev-certs` (`devpki`)."""
