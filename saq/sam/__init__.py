"""SAM knowledge: building the models, which attention is which, reconstruction units, the segmenter."""
