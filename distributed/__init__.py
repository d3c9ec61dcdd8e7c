"""Process groups, checkpoints and launch (imported as ``facekd.distributed``)."""
