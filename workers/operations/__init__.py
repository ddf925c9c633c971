"""What operators do to jobs, shared by the CLI and the gateway."""
