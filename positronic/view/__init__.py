"""`positronic view`: a live web page of a session, fed by the authority's Watch.

link.py (the one connection to the authority) -> hub.py (what the view knows, refreshed at a
bounded rate, fanned out through topic.py) -> server.py (aiohttp: the page and one event stream
per browser); render.py and commits.py are the pure parts; static/ is the page.
"""
