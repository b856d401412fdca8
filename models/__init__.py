"""Model builds: the embedding export, the decoder zoo and the complexity classifier."""
