"""Standalone mode's pod source: the manifest directory (inotify watch plus rescan),
bounded parsing of each file into static pods and Services, and the feed of those
Services into the service proxy."""
