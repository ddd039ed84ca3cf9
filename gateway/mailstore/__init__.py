"""The mail store: folders, messages, UIDs, flags, MODSEQ, quota and change notifications."""
