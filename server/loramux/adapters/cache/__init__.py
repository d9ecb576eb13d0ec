"""The adapter cache tiers: device slots and leases, host tier, merged copies, merge policy."""
