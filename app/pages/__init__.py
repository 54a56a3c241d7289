"""One module per UI page; app.ui assembles them into the Blocks.

Each page module builds its widgets inside the caller's gr.Tab and wires its own events; what a page needs
from another (the Setup form's widgets, the run shown) is passed in explicitly. app.pages.common holds the
settings every page shares and the widgets two pages draw alike (plots, sample gallery).
"""
