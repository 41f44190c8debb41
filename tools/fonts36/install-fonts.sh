#!/bin/sh
# Install the Debian font packages used by generate.py.
set -eu
apt-get install -y --no-install-recommends \
    fonts-urw-base35 \
    fonts-dejavu-core \
    fonts-liberation2 \
    fonts-freefont-ttf \
    fonts-dkg-handwriting \
    fonts-sjfonts \
    fonts-comic-neue \
    fonts-kristi \
    fonts-bwht \
    fonts-rufscript \
    fonts-tlwg-purisa-otf \
    fonts-breip \
    fonts-dancingscript \
    fonts-humor-sans \
    fonts-tomsontalks \
    fonts-kaushanscript
