"""Stand-ins for Google Cloud Storage in the installer's GCS-mode tests (loopback only)."""
