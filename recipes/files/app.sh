#!/bin/sh
# The demo application: Celestial runs /app.sh once the overlay is mounted;
# when it returns, the microVM powers off.
echo "castore-demo: hello from $(hostname), kernel $(uname -r)"
echo "castore-demo: written by the app at boot" > /root/hello.txt
echo "castore-demo: done"
