"""Task definitions, one module per job family. Bodies stay thin: validate, call, report."""
