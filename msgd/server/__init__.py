"""The daemon: process wiring and reload (`daemon`), one adapter per gateway connection
(`connection`), the per-UE rules of wire-v1 §5 (`rules`), and the ports the adapters see the
server through (`ports`)."""
