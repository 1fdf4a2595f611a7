"""The engine side: requests, the KV block pool, the scheduler, the three-call step and
the outputs it assembles."""
