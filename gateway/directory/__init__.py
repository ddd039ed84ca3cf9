"""Who exists, what they own and where an address routes: the directory service, national identifiers, imports."""
