"""``metaseg-predict``: adapt to a few labelled images, segment a folder, save the adapted model."""
