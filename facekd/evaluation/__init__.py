"""The evaluation suite beyond one ``.bin``: every verification set at once with cached embeddings.

``facekd.eval`` holds the verification metrics (insightface's 10-fold protocol, ROC, TAR@FAR) and the
one-file path; this package embeds many images fast (decoding threads, uint8 batches normalised on the
device), caches embeddings per checkpoint and data file, and runs whole benchmark folders and the IJB-B/C
template protocol.
"""
