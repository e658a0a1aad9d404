"""Transport security and identity: TLS certificates, enrollment tokens, credentials."""
