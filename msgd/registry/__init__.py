"""The registry: registrations in memory, made durable in SQLite by a group-committing writer
thread (`store`), and the provisioned subscriber store with its CSV reader (`provisioning`)."""
