import { defineConfig } from "vite";

// Fixed asset names: rtap-server embeds dist/ at compile time and serves
// each file under /dashboard/; CI rebuilds and compares byte for byte.
export default defineConfig({
  base: "/dashboard/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsInlineLimit: 0,
    rollupOptions: {
      output: {
        entryFileNames: "assets/dashboard.js",
        chunkFileNames: "assets/[name].js",
        assetFileNames: "assets/dashboard[extname]",
      },
    },
  },
});
