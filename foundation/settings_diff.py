"""Settings of two runs compared key by key, so a refusal names what differs (resume, shard folders, studies)."""


def differing_settings(stored, current, ignore=()):
    """Sorted keys whose values differ between two settings dicts; a key one side lacks counts as None there."""
    return sorted(key for key in set(stored) | set(current)
                  if key not in ignore and stored.get(key) != current.get(key))


def describe_differences(stored, current, stored_label, current_label, ignore=()):
    """'key: <stored_label> value vs <current_label> value' for each differing key, joined by '; '."""
    return "; ".join(f"{key}: {stored_label} {stored.get(key)!r} vs {current_label} {current.get(key)!r}"
                     for key in differing_settings(stored, current, ignore))
