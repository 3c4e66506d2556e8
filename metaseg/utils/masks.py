"""The mask value that means "no label here", shared by every layer that reads masks.

Label maps write it (void pixels, classes a mix does not use), the losses and the metrics skip
it, the reports paint it: one constant, so they cannot drift apart. 255 fits a uint8 mask and
leaves 0..254 for classes.
"""

IGNORE = 255
