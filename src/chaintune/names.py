"""Names that become folder names (experiments, chains, stages, user tasks): one pattern, shared by config and tasks."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # safe as a directory name (at most 64 characters)
