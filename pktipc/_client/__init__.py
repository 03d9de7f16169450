"""What a client process runs: the client and the capture-file writer."""
