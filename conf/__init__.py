# Hydra reads this package's YAML through ``pkg://metaseg.conf`` (setuptools maps conf/ there).
