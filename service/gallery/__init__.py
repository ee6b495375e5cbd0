"""Face galleries: the store, the in-memory index and the replica that keeps it current."""

GALLERY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # a gallery's name: the API's {g} (and the enroll CLI's --gallery)
