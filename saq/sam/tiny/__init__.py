"""sam_tiny: the small SAM this project trains and ships (training recipe, card)."""
