# The BootSeer daemon image: snapshotter and registry sidecar entry points.
# Built from the same installer as CI and the quickstart.  Run privileged with /dev/fuse, host /var/lib/bootseer
# and the containerd socket dir mounted (see integration/k8s/ once it lands).
FROM debian:bookworm-slim
ENV BOOTSEER_EXTRAS=""
COPY . /opt/bootseer/src
WORKDIR /opt/bootseer/src
RUN integration/install.sh && rm -rf /var/lib/apt/lists/* /root/.cache
ENTRYPOINT ["bootseer"]
CMD ["snapshotter", "serve", "--config", "/etc/bootseer/config.toml"]
