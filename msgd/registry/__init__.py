"""The registry: which UE is registered through which gateway, and the provisioned UEs.

`port` (what the server asks of a registry) and `local` (that port over Registry), `store`
(Registry: registrations in memory and the registry's public API), `writer` (the one
writer thread, group commit), `snapshot` and `blobs` (the durable state and its encoding),
`schema` (the file: lock, check at open, schema, migrations), `provisioning_store` (the
provisioned subscriber store and admin changes) with `provisioning_index`,
`provisioning_replace` and `provisioning` (rows and their CSV file), `sql` (shared helpers).
"""
